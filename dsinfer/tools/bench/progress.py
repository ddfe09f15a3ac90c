"""The bench's progress bars on stderr: one over the phases (loading, then each section of figures), one over the
current phase's requests; both are cleared when done, so that the report stays clean."""
import sys
from contextlib import contextmanager

from tqdm import tqdm

BAR = "bench: {n_fmt}/{total_fmt} phases done, now {desc} [{elapsed}]"


def phase_count(compare: bool) -> int:
    """dsinfer: loading + 4 sections; transformers: loading + 3 sections (it has no latency figures)."""
    return 5 + (4 if compare else 0)


class Progress:
    def __init__(self, phases: int, enabled: bool):
        self.enabled = enabled
        self.phases = tqdm(total=phases, desc="starting", file=sys.stderr, position=0, leave=False,
                           disable=not enabled, bar_format=BAR)

    @contextmanager
    def phase(self, name: str, total: int | None = None):
        """Yields the tick that advances the bar of this phase's `total` requests."""
        self.phases.set_description_str(name)
        bar = tqdm(total=total, desc=name, unit="req", file=sys.stderr, position=1, leave=False,
                   disable=not self.enabled or total is None)
        try:
            yield bar.update
        finally:
            bar.close()
            self.phases.update()

    def write(self, text: str):
        """Prints to stdout without breaking the bars."""
        tqdm.write(text, file=sys.stdout)

    def close(self):
        self.phases.close()
