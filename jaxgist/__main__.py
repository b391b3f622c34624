from jaxgist.main import cli

cli()
