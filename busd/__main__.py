from busd.cli import main

main()
