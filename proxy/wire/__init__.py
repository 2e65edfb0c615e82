"""Sans-I/O PostgreSQL v3 protocol pieces: message codec and framer, no asyncio in here."""
