"""Where prompts come from: the first stage of a build, which makes the rows (`Stage.start`)."""
