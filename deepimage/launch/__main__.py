"""python -m deepimage.launch: see deepimage.launch.supervise."""
from deepimage.launch.supervise import main

if __name__ == "__main__":
    main()
