"""edgefleet wire contract, shared by the controller and the agent.

Holds the generated protobuf messages (``protos.edgefleet.v1``), MQTT topic names
(:mod:`protos.topics`), signed envelopes (:mod:`protos.envelope`), the TUF-style key list
(:mod:`protos.trust`), typed errors (:mod:`protos.errors`) and delta codecs
(:mod:`protos.codecs`). It imports neither ``controller`` nor ``agent``.
"""

WIRE_VERSION = "v1"
