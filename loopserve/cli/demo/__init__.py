"""`loopserve demo`: the whole loop end to end on real data, with simulated annotators.

- `stack`: a run folder of its own (store hard-linked from the main store, log, tokens, trainer dir)
  and the three processes (policy, reward, trainer) started on loopback and stopped on any exit.
- `annotators`: simulated annotators (ground truth from the data, an error rate, disagreement).
- `annotation`: the annotation demo (an app streams items through Annotate; humans review some).
- `passive`: the offline baselines (random sampling at the same budget; the all-labels ceiling).
- `generation`: the generation demo (simulated preference labeller, reward model, GRPO / DPO).
- `report`: Markdown report, PNG plots and summary.json in the run folder.
"""
