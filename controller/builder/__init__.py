"""Remote builders: engines compiled on hardware of their class (docs/builder.md).

``program.run_builder`` is the builder (``edgefleet builder run``); ``dispatcher.BuildDispatcher``
and ``http.install_builder_routes`` are the controller side; ``protocol`` holds the shared rules.
"""
