"""Example and test models built without torch (digits CNN, quant-hostile model)."""
