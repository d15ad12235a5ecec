"""Stages that are not training and not data readers: they make data with a model (rejection
sampling, AI feedback). Training stages live in `lmforge.train`, data stages in `lmforge.data`."""
