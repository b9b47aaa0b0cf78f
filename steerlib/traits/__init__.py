"""What a trait is (instruction pairs, questions, rubric), the built-in library, drafting new traits, and judges."""
