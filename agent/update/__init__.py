"""The agent's OTA update pipeline: receive -> verify -> download -> patch -> stage ->
activate -> commit | rollback. Entry point: :class:`agent.update.manager.UpdateManager`."""
