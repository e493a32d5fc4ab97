import sys

from nuclass_qupath.cli import main

sys.exit(main())
