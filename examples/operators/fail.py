import os
import sys

print(f"fail: refusing to process {os.environ.get('INPUT_FILE')}", file=sys.stderr)
sys.exit(3)
