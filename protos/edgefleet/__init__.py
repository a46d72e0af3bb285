"""Protobuf package ``edgefleet`` (generated code lives in ``protos.edgefleet.v1``)."""
