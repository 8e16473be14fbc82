"""python -m deepimage.tracking: see deepimage.tracking.workflow."""
from deepimage.tracking.workflow import main

if __name__ == "__main__":
    main()
