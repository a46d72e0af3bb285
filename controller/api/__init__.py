"""REST API of the controller (FastAPI). ``controller.api.app.create_app(core)`` builds it."""
