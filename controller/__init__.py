"""edgefleet controller: the cloud side (reconcile, compile, store, OTA, fleet state, API)."""
