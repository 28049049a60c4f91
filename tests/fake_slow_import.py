"""A backend module whose import takes two seconds of blocking work, as torch's or vLLM's does."""

import time

from fake_backend import FakeBackend

time.sleep(2.0)


class SlowBackend(FakeBackend):
    name = "slow"
