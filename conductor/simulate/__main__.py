import sys

from conductor.simulate.main import main

sys.exit(main())
