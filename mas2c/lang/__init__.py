"""The spec language: its typed model (`spec`: the IR and the step-kind registry), how a
spec file is read with limits (`source`), how it is checked with located, coded problems
(`validate`) and the placeholder expressions inside its strings (`expr`).

Nothing here runs a spec or touches the network; every other stage (compile, graph, diff,
configure, rectify, generate) consumes the validated model from here.
"""
