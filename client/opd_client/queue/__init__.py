"""The rollout queue over Redis Streams: producer (samplers), consumer (trainers), key names.

The scorer that sits between them is `opd scorer` (opd_services.scorer)."""
from opd_client.queue.consumer import ScoredConsumer
from opd_client.queue.keys import (GROUP_SCORERS, GROUP_TRAINERS, dead_key, rollouts_key, scored_key,
                                   trim_consumed)
from opd_client.queue.producer import AsyncRolloutProducer, RolloutProducer
from opd_client.types import Rollout, ScoredRollout

__all__ = ["RolloutProducer", "AsyncRolloutProducer", "ScoredConsumer", "Rollout", "ScoredRollout",
           "rollouts_key", "scored_key", "dead_key", "trim_consumed", "GROUP_SCORERS", "GROUP_TRAINERS"]
