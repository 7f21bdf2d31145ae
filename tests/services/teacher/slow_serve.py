"""`opd serve` over the uniform engine made slow (a fixed sleep in every engine call), as its own
process: what the drain tests send SIGTERM to while requests are surely in flight. The same code
path as `opd serve` (settings from OPD_*, TeacherServer.serve_forever and its signal handling);
only the engine differs. Usage: python slow_serve.py DELAY_SECONDS."""
from __future__ import annotations

import asyncio
import logging
import sys
import time

from opd_services.config import Settings
from opd_services.teacher.engines.uniform_engine import UniformEngine
from opd_services.teacher.server import TeacherServer

VOCAB = 64


class SlowUniform(UniformEngine):
    """The uniform engine (vocab 64: every logprob is -log 64) sleeping `delay_s` per engine call."""

    def __init__(self, delay_s: float):
        super().__init__(vocab_size=VOCAB, max_model_len=256)
        self.delay_s = delay_s

    def score(self, items):
        time.sleep(self.delay_s)
        return super().score(items)


if __name__ == "__main__":
    delay_s = float(sys.argv[1])
    settings = Settings.load()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(TeacherServer(settings, engine=lambda: SlowUniform(delay_s)).serve_forever())
