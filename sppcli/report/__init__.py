"""What a pipeline's results look like to a person: Table 6 (`sppcli report`), its HTML page
(`sppcli report --html`) and the paper's other tables (`sppcli paper`)."""
