"""The only writers: the state database, the tree, and the pages rendered
into it (project pages, root index), plus the parser of what they link."""
