"""Every stage config the pipeline builder knows, keyed by its ``op`` name.

A new operator registers here by adding its config class to ``STAGE_CONFIGS``.
"""

from __future__ import annotations

from operators.base import StageConfig
from operators.lm.stage import LMStageConfig
from operators.membership.lowercase import LowercaseTextConfig
from operators.preselect.stage import PreSelectConfig
from operators.sae.stage import SAESelectConfig
from operators.scores import ScoresConfig
from operators.token_premium.stage import TokenCountsConfig

STAGE_CONFIGS: tuple[type[StageConfig], ...] = (TokenCountsConfig, PreSelectConfig, LMStageConfig,
                                                 ScoresConfig, LowercaseTextConfig, SAESelectConfig)
