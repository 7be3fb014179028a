"""`python -m layerskip_ext.training ...`: see cli.py."""
import sys

from .cli import main

sys.exit(main())
