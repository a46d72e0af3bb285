"""Generated protobuf messages of the edgefleet wire contract, version v1 (see protos/generate.sh)."""
