"""Release: build → validate → package every artifact, with model cards and laptop fit."""
