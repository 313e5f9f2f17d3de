"""The regression gate: a run's metrics against a stored baseline of the same device class, under
the rules of a thresholds file.

- ``rules``: the thresholds file's grammar (which metrics, which bound, on which devices);
- ``sources``: what is compared, drawn from results files, and when two are comparable at all;
- ``verdicts``: one verdict per rule and metric, and the gate's table;
- ``commands``: ``python -m bench gate | baseline | spread`` (their arguments live in bench/cli.py).
"""
