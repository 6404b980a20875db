"""`python -m pipeline.synth`: WebVid-format demo/test shards. The code lives in `fixtures.synth`."""

from fixtures.synth import main

if __name__ == "__main__":
    main()
