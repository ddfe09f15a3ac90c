import sys

from dsinfer.cli import main

sys.exit(main())
