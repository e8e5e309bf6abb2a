"""`python -m asyncinfer.loadgen`: one run, its summary as JSON (see asyncinfer.loadgen.cli)."""

import sys

from asyncinfer.loadgen.cli import main

sys.exit(main())
