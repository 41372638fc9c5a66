"""The exceptions the CLI turns into a one-line message and an exit code."""


class LmforgeError(Exception):
    """A user-facing error. The message names the file, field or flag and says what to do."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was written and the process should exit with ``code``."""

    def __init__(self, signum: int, step: int, ckpt: str):
        self.code = 128 + signum
        self.step = step
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint {ckpt}; continue with --resume auto")
