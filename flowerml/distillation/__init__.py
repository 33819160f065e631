"""Knowledge distillation: a frozen teacher, the student's task and training, their agreement and costs, and the student's release."""
