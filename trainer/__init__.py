"""The trainer: a log consumer and one small learner per objective (see DESIGN.md, "Trainer")."""
