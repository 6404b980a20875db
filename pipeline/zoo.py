"""`python -m pipeline.zoo`: the tiny model zoo. The code lives in `fixtures.zoo`."""

from fixtures.zoo import main

if __name__ == "__main__":
    main()
