"""Fleet state: SQLModel tables, device registry, telemetry ingest, rollout bookkeeping."""
