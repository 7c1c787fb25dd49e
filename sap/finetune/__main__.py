from sap.cli import run_module

run_module("finetune")
