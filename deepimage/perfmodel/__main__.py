"""python -m deepimage.perfmodel: the predict_scaling stage (stage.main)."""
from deepimage.perfmodel.stage import main

if __name__ == "__main__":
    main()
