"""python -m deepimage.perfmodel: the predict_scaling stage (stage.main)."""
from deepimage.perfmodel.stage import main

main()
