"""Shadow traffic: statements the relay observed (`observe`), their results' digests (`digest`), mirrored
to shadow databases (`mirror`), captured to a file and replayed (`capture`, `replay`)."""
