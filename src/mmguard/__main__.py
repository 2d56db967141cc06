from mmguard.cli import main

main(prog_name="mmguard")
