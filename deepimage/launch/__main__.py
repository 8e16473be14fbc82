"""python -m deepimage.launch: see deepimage.launch.supervise."""
from deepimage.launch.supervise import main

main()
