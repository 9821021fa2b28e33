import sys

from gridlb.cli import main

sys.exit(main())
