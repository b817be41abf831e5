"""Offline test models: tiny chat models with real chat templates, tiny reward models, the templates themselves."""
