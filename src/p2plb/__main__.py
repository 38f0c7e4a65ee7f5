from p2plb.cli import main

main()
