"""Prompt rewriting with the PromptEnhancer models (7B and 32B)."""

from hyimage.reprompt.prompts import normalize_quotes
from hyimage.reprompt.reprompter import Reprompter

__all__ = ["Reprompter", "normalize_quotes"]
