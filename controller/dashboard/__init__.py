"""Web dashboard of the controller (server-rendered HTML + a small polling script).

``controller.dashboard.pages.install_dashboard(app, core)`` is called by controller/api/app.py.
"""
