"""Text from language and vision-language models: a client for OpenAI-compatible chat endpoints
(``client``), its answer cache (``cache``), versioned prompts (``prompts``) and answer validators
(``answers``). A low layer: it imports only ``jaxgist.core`` and third-party packages."""

from jaxgist.describe.cache import AnswerCache, cache_key
from jaxgist.describe.client import BadAnswer, ChatSettings, Client, EndpointError, Request, Result, Stats, is_refusal

__all__ = ["AnswerCache", "BadAnswer", "ChatSettings", "Client", "EndpointError", "Request", "Result", "Stats",
           "cache_key", "is_refusal"]
