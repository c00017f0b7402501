"""The engines there are, by the name the ``lm`` stage config picks (``LMStageConfig.backend``), and
the one function that loads one. Each is imported only when used: a config names ``vllm`` without
importing vLLM. The backends import ``operators.lm.engine`` (the protocol), never this module."""

from __future__ import annotations

import importlib

from operators.lm.engine import Engine, EngineSettings

#: Every engine there is -> its class ("module:Class"), imported only when used. The lm stage config
#: picks one (``LMStageConfig.backend``: ``model.backend``, and for vllm its ``vllm.mode``).
BACKENDS: dict[str, str] = {"torch": "operators.lm.torch_engine:TorchEngine",
                            "vllm": "operators.lm.vllm_engine:VLLMEngine",
                            "vllm_logprobs": "operators.lm.vllm_logprobs:VLLMPromptLogprobsEngine"}


def open_engine(settings: EngineSettings) -> Engine:
    """Load the engine ``settings.backend`` names."""
    module_name, _, cls_name = BACKENDS[settings.backend].partition(":")
    engine_cls = getattr(importlib.import_module(module_name), cls_name)
    return engine_cls.from_settings(settings)
