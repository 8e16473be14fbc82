"""python -m deepimage.tracking: see deepimage.tracking.workflow."""
from deepimage.tracking.workflow import main

main()
