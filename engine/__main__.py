"""`python -m engine`: the engine command line (an interruption while it starts is one line too)."""
import signal
import sys


def _terminated(signum, frame):  # SIGTERM before the command installs its own handler: nothing has started yet
    print("engine: interrupted", file=sys.stderr)
    sys.exit(143)


signal.signal(signal.SIGTERM, _terminated)
try:
    from engine.cli import main
except KeyboardInterrupt:
    print("engine: interrupted", file=sys.stderr)
    sys.exit(130)
sys.exit(main())
