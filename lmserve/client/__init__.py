"""Clients for a running api_server: `APIClient` (LMDeploy's method names) and the console chats."""
from lmserve.client.api_client import APIClient, APIError, get_model_list

__all__ = ["APIClient", "APIError", "get_model_list"]
