"""Prompt rewriting with the PromptEnhancer models (7B and 32B). May import offload (its model streams),
loading and the bottom modules."""

from hyimage.reprompt.prompts import normalize_quotes
from hyimage.reprompt.reprompter import Reprompter

__all__ = ["Reprompter", "normalize_quotes"]
