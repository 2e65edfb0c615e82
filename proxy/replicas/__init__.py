"""Read replicas: health and replay positions (`health.ReplicaSet`), and routing reads to them (`routing`)."""
